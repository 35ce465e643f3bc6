"""Benchmarks: each script measures one claim and writes its section of BENCHMARKS.md with the
device, date and command. Run a script from the repository root as ``python -m benchmarks.NAME``.

Scripts import the shared modules, never each other: ``images`` (the images they send),
``servers`` (a free port, a server started and waited for), ``load`` (wrk and the Python closed
loop, and the server CPU they measure), ``engines`` (the engines a speed benchmark times),
``turns`` (ways of asking one service, loaded in turn), ``peers`` (what the servers the service is
measured against share), ``parallel`` (test images as photos, scored in processes), ``ood_sets``
(images that are not clothes, and AUROC) and ``report`` (writing a section).
``benchmarks.gpu`` is the suite for a GPU machine's short lease.
"""
