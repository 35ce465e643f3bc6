-- wrk script: POST prebuilt request bodies in turn, and print the run's figures as one JSON line.
--   wrk -t2 -c32 -d15s -s benchmarks/multipart.lua http://127.0.0.1:3000/classify -- BODY_DIR COUNT CONTENT_TYPE [HEADER ...]
-- BODY_DIR holds COUNT files named 0 .. COUNT-1, each a whole body (a multipart form, say) with
-- CONTENT_TYPE (its boundary included); each HEADER ("Name: value") is sent with every request.
-- Written by benchmarks/wrk_load.py.
local bodies, headers, next_body = {}, {}, 1
local threads = 0

-- Each thread starts at a different body, so threads do not send the same image at the same moment.
function setup(thread)
  thread:set("offset", threads * 7919)
  threads = threads + 1
end

function init(args)
  local dir, count = args[1], tonumber(args[2])
  headers["Content-Type"] = args[3]
  for i = 4, #args do
    local name, value = args[i]:match("^([^:]+):%s*(.*)$")
    headers[name] = value
  end
  for i = 0, count - 1 do
    local file = assert(io.open(dir .. "/" .. i, "rb"))
    bodies[#bodies + 1] = file:read("*a")
    file:close()
  end
  next_body = (offset or 0) % count + 1
end

function request()
  local body = bodies[next_body]
  next_body = next_body % #bodies + 1
  return wrk.format("POST", nil, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, "timeouts": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
