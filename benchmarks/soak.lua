-- wrk script for benchmarks/soak.py: send a weighted mix of prebuilt requests (each its own method,
-- path, headers and body), count the answers by status, and print the run's figures as one JSON line.
--   wrk -t2 -c8 -d60s -s benchmarks/soak.lua http://127.0.0.1:3000 -- REQUEST_DIR
-- REQUEST_DIR/schedule lists request numbers, one per line, in the order to send them (a request
-- appears as often as its weight); request N is N.head ("METHOD PATH", then "Name: value" lines)
-- and N.body.
local requests, schedule, next_request = {}, {}, 1
local threads = {}
statuses = {}  -- a global: done() reads each thread's with thread:get

function setup(thread)
  thread:set("offset", #threads * 7919)  -- each thread starts at another point of the schedule
  table.insert(threads, thread)
end

local function read(path)
  local file = assert(io.open(path, "rb"))
  local data = file:read("*a")
  file:close()
  return data
end

function init(args)
  local dir = args[1]
  for line in io.lines(dir .. "/schedule") do
    local n = tonumber(line)
    if requests[n] == nil then
      local head, headers = read(dir .. "/" .. n .. ".head"), {}
      local method, path = head:match("^(%S+) (%S+)")
      for name, value in head:gmatch("\n([^:\n]+):%s*([^\n]*)") do
        headers[name] = value
      end
      requests[n] = wrk.format(method, path, headers, read(dir .. "/" .. n .. ".body"))
    end
    schedule[#schedule + 1] = n
  end
  next_request = (offset or 0) % #schedule + 1
end

function request()
  local n = schedule[next_request]
  next_request = next_request % #schedule + 1
  return requests[n]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests_)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      total[status] = (total[status] or 0) + count
    end
  end
  local parts = {}
  for status, count in pairs(total) do
    parts[#parts + 1] = string.format('"%d": %d', status, count)
  end
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "statuses": {%s}, "socket_errors": %d, "timeouts": %d, ' ..
    '"p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, table.concat(parts, ", "), e.connect + e.read + e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
