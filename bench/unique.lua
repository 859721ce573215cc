-- wrk script for the benchmark: every request carries a new click id, so every postback is a new
-- conversion (a repeat would be answered "duplicate" and measure a cheaper path).
-- Arguments (after `--`): a path with {id} where the click id goes, and a prefix unique to the run.
-- done() prints one JSON line that bench/run.py reads.

local template = "/"
local prefix = "x"
local counter = 0
local threads = {}

function setup(thread)
  -- Each wrk thread has its own Lua state: give each its own part of the id space.
  thread:set("thread_index", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  template = args[1]
  prefix = args[2] .. "t" .. tostring(thread_index or 1) .. "n"
end

function request()
  counter = counter + 1
  -- The hex head scatters ids over the whole index, as trackers' random click ids do (bench/load.py
  -- makes the same ids). The product stays below 2^53, exact in Lua's doubles, for 3 million requests.
  local id = string.format("%08x", (counter * 2654435761) % 4294967296) .. prefix .. tostring(counter)
  local path = template:gsub("{id}", id)
  return wrk.format("GET", path)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, '
      .. '"status_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, latency.mean))
end
