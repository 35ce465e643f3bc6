"""Hostile images against the decode boundary and the decoder processes, in process: every class
of crafted file is an ImageError naming the problem, costly ones are refused from their header,
a decode past its time is stopped by killing its process, and N worst-case decodes at once stay
under the documented memory bound. Plus a fuzz step: mutated real images, only ImageError out."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
import warnings

import numpy as np
import psutil
import pytest

from model_store import ImageError, image_bytes_to_input
from model_store.preprocess import (
    DECODE_COPIES,
    HEAP_PAD_BYTES,
    MAX_JPEG_SCANS,
    ROW_OVERHEAD_BYTES,
    decode_cost_bytes,
    open_image,
)
from model_store.store import DEFAULT_MODEL_FILE, read_onnx_card
from serving import decoders
from serving.decoders import DecodePool
from serving.errors import DecodersUnavailable
from tests.conftest import wait_until
from tests.hostile import crafted, encoded, progressive_jpeg_with_scans, stalled, tall_png

CARD = read_onnx_card(DEFAULT_MODEL_FILE)  # 1 x 28 x 28
RGB_CARD = dataclasses.replace(CARD, in_channels=3, height=224, width=224, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.fixture(autouse=True)
def quiet_pillow():
    with warnings.catch_warnings():  # Pillow warns about the corrupt EXIF it is shown; that is the point
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("name", sorted(crafted()))
def test_each_crafted_file_is_an_image_error_naming_the_problem(name):
    data = crafted()[name]
    assert len(data) < 1000  # tiny files, each once a 500
    with pytest.raises(ImageError, match=r"^corrupt (PNG |WEBP |TIFF )?image: cannot \w+"):
        image_bytes_to_input(data, CARD)


def test_a_progressive_jpeg_is_decoded_up_to_the_scan_limit_and_refused_past_it():
    fine = progressive_jpeg_with_scans(MAX_JPEG_SCANS - 20)
    assert image_bytes_to_input(fine, CARD).shape == (1, 28, 28)
    costly = progressive_jpeg_with_scans(MAX_JPEG_SCANS)
    with pytest.raises(ImageError, match=rf"progressive JPEG with \d+ scans; at most {MAX_JPEG_SCANS} are decoded"):
        open_image(costly)  # from its bytes, before any decoding


def test_decode_memory_is_estimated_from_the_header_and_a_narrow_bomb_refused_under_the_pixel_limit():
    tall = tall_png(2_000_000)  # 2 megapixels, under any pixel limit, and ~8 KB of file
    image = open_image(tall, max_pixels=10**9, max_decode_bytes=10**9)
    assert decode_cost_bytes(image) == DECODE_COPIES * 2_000_000 * (1 + ROW_OVERHEAD_BYTES)
    with pytest.raises(ImageError, match=r"image too costly to decode: 1x2000000 L needs about 97 MB, above .* 64 MB"):
        open_image(tall, max_decode_bytes=64 * 2**20)


def mutations(data: bytes, rng: random.Random, count: int):
    """Byte flips, truncations, duplicated and deleted spans of one real file."""
    for _ in range(count):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            if not mutated:
                break
            kind, at = rng.randrange(4), rng.randrange(len(mutated))
            if kind == 0:
                mutated[at] = rng.randrange(256)
            elif kind == 1:
                del mutated[at:]
            elif kind == 2:
                mutated[at:at] = mutated[at : at + rng.randint(1, 64)]
            else:
                del mutated[at : at + rng.randint(1, 64)]
        yield bytes(mutated)


def test_fuzz_only_image_errors_come_out_of_to_input(fashion_test):
    rng = random.Random(12)
    photo = np.stack([fashion_test[0][0]] * 3, axis=-1)
    seeds = [encoded(fmt, photo) for fmt in ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")]
    seeds += [encoded("JPEG", photo, progressive=True), *crafted().values()]
    outcomes = {"decoded": 0, "refused": 0}
    for seed in seeds:
        for data in mutations(seed, rng, 150):
            try:
                image_bytes_to_input(data, RGB_CARD if rng.random() < 0.5 else CARD)
                outcomes["decoded"] += 1
            except ImageError:
                outcomes["refused"] += 1
    assert outcomes["refused"] > 300 and outcomes["decoded"] > 100  # both paths were exercised


DECODE_TIMEOUT_S = 0.5  # about 100 times what a 300x300 JPEG takes here: holds on one core, and 4x slower
SMALL = encoded("JPEG", np.full((300, 300, 3), 90, np.uint8))
TIMED_OUT = rf"decoding took longer than {DECODE_TIMEOUT_S:g} s \(SERVING_DECODE_TIMEOUT_S\); stopped"


def decoder_pids() -> set[int]:
    """This process's live decoder processes (killed ones may linger as zombies until reaped)."""
    pids = set()
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "serving.decoders" in " ".join(child.cmdline()):
                pids.add(child.pid)
        except psutil.Error:  # gone, or a zombie, between listing and asking
            continue
    return pids


@pytest.fixture
def pool():
    """Two decoder processes, both started and idle; ``pool.pids()`` are theirs, live."""
    others = decoder_pids()  # another test's pool may still be closing
    pool = DecodePool(2, timeout_s=DECODE_TIMEOUT_S, max_pixels=40_000_000, max_decode_bytes=512 * 2**20)
    pool.pids = lambda: decoder_pids() - others
    pool.start()
    wait_until(lambda: pool.idle.qsize() == 2, "two idle decoder processes")
    yield pool
    pool.close()


@pytest.mark.processes
def test_decoders_that_cannot_start_are_a_503_naming_why_until_they_can(monkeypatch):
    """No decoder process can start (here: the interpreter is missing, as in a broken install): a
    request gets the reason at once, not a wait until its deadline, and the pool is not ready
    (start_error, which the service's readiness reads). Each failed slot tries again when a request
    meets it, so the pool heals once processes can start."""
    pool = DecodePool(2, timeout_s=DECODE_TIMEOUT_S, max_pixels=40_000_000, max_decode_bytes=512 * 2**20)
    monkeypatch.setattr(decoders.sys, "executable", "/nonexistent/python3")
    pool.start()
    wait_until(lambda: pool.idle.qsize() == 2, "both slots tried")
    assert pool.start_error.startswith("no decoder process could start") and "/nonexistent/python3" in pool.start_error

    async def outcome() -> str:
        try:
            await pool.decode(SMALL, RGB_CARD)
        except DecodersUnavailable as err:
            assert "/nonexistent/python3" in str(err)
            return "503"
        return "ok"

    try:
        assert asyncio.run(outcome()) == "503"
        wait_until(lambda: pool.idle.qsize() == 2, "the slot tried again, and failed again")
        monkeypatch.undo()  # processes can start again
        assert [asyncio.run(outcome()) for _ in range(3)] == ["503", "503", "ok"]  # each failed slot, then a decoder
        wait_until(lambda: pool.start_error is None, "start_error cleared by a decoder that started")
        wait_until(lambda: pool.idle.qsize() == 2, "both decoders up, none left starting to leak past close")
    finally:
        pool.close()


@pytest.mark.processes
def test_a_decode_past_its_time_limit_is_stopped_and_its_process_replaced(pool):
    before = pool.pids()

    async def main():
        with stalled(before):  # the decode never ends: only the time limit can stop it
            with pytest.raises(ImageError, match=TIMED_OUT):
                await pool.decode(SMALL, RGB_CARD)
        return [await pool.decode(SMALL, RGB_CARD) for _ in range(4)]  # the pool goes on, one process new

    answers = asyncio.run(main())
    assert all(a.shape == (3, 224, 224) for a in answers)
    after = wait_until(lambda: pids if len(pids := pool.pids()) == 2 else None, "two live decoders")
    assert len(before & after) == 1 and pool.restarts == 1


@pytest.mark.processes
def test_a_cancelled_decode_is_stopped_too(pool, monkeypatch):
    before, asked = pool.pids(), threading.Event()
    ask = decoders._Decoder.ask

    def noted_ask(decoder, *args):  # the image is on its way to a decoder process
        asked.set()
        return ask(decoder, *args)

    monkeypatch.setattr(decoders._Decoder, "ask", noted_ask)

    async def main():
        with stalled(before):
            decode = asyncio.create_task(pool.decode(SMALL, RGB_CARD))
            await asyncio.to_thread(asked.wait, 60)
            decode.cancel()  # the request's deadline passed, or its client hung up
            with pytest.raises(asyncio.CancelledError):
                await decode

    asyncio.run(main())
    wait_until(lambda: pool.restarts == 1, "the cancelled decode's process killed")
    assert len(before - pool.pids()) == 1  # killed, not left to run to the time limit


@pytest.mark.processes
def test_more_stuck_decodes_than_processes_do_not_stop_decoding(pool):
    """Each stuck decode's replacement starts at once, not behind the decodes queued for a process:
    once every feeding thread waited for an idle process, the replacements never started, and no
    image was decoded again."""
    before = pool.pids()

    async def main():
        with stalled(before):
            decodes = [pool.decode(SMALL, RGB_CARD) for _ in range(6)]
            return await asyncio.wait_for(asyncio.gather(*decodes, return_exceptions=True), 120)

    answers = asyncio.run(main())
    assert [type(a) for a in answers] == [ImageError] * 2 + [np.ndarray] * 4, answers
    assert pool.restarts == 2 and not before & pool.pids()


@pytest.mark.processes
def test_worst_case_decodes_at_once_stay_under_the_documented_memory_bound():
    budget = 96 * 2**20
    others = decoder_pids()
    pool = DecodePool(2, timeout_s=30, max_pixels=40_000_000, max_decode_bytes=budget)
    # The largest of each shape the estimate admits: a square RGB image, and a 1-pixel-wide one.
    side = 2800
    square = encoded("PNG", np.full((side, side, 3), 7, np.uint8))
    assert decode_cost_bytes(open_image(square, max_decode_bytes=budget)) <= budget
    tall = tall_png(budget // (DECODE_COPIES * (1 + ROW_OVERHEAD_BYTES)))
    try:

        async def main():
            await pool.decode(encoded("PNG", np.zeros((300, 300), np.uint8)), CARD)
            started = {pid: psutil.Process(pid).memory_info().rss for pid in decoder_pids() - others}
            answers = await asyncio.gather(*(pool.decode(data, RGB_CARD) for data in (square, tall, square, tall)))
            return started, answers

        started, answers = asyncio.run(main())
        assert all(answer.shape == (3, 224, 224) for answer in answers)
        for pid, rss in started.items():
            peak = _peak_rss(pid)
            bound = rss + HEAP_PAD_BYTES + budget  # README, "Limits": start-up + kept + SERVING_MAX_DECODE_MB
            assert peak <= bound, f"decoder {pid} peaked at {peak / 2**20:.0f} MB, start {rss / 2**20:.0f} MB"
    finally:
        pool.close()


def _peak_rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.mark.processes
def test_a_decoder_keeps_its_memory_from_one_decode_to_the_next():
    """A decoder decodes image after image. Giving freed memory back to the kernel after each made
    the next fault every page in again: a third of a 1024x768 WebP's CPU. Counted in page faults,
    not time: five more decodes of a photo fault in less than one copy of its pixels."""
    others = decoder_pids()
    pool = DecodePool(1, timeout_s=30, max_pixels=40_000_000, max_decode_bytes=512 * 2**20)
    photo = encoded("WEBP", np.random.default_rng(0).integers(0, 256, (768, 1024, 3), np.uint8))
    pixel_pages = 1024 * 768 * 4 // 4096  # Pillow holds RGB as 4 bytes a pixel
    try:

        async def faults_of(decodes: int) -> int:
            (pid,) = decoder_pids() - others
            before = _minor_faults(pid)
            for _ in range(decodes):
                await pool.decode(photo, RGB_CARD)
            return _minor_faults(pid) - before

        async def main():
            await pool.decode(photo, RGB_CARD)  # the first decode grows the heap: its faults are due
            return await faults_of(5)

        assert asyncio.run(main()) < pixel_pages
    finally:
        pool.close()


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])  # minflt, field 10 of proc(5)
