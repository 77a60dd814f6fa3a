-- wrk script: POST JSON bodies read from a file (one per line), cycled in order, each thread
-- starting at its own offset; prints one JSON line of results when the run is done.
--
--   wrk -t1 -c8 -d10s -s bench/wrk_post.lua http://127.0.0.1:8000/v1/search -- bodies.jsonl
--
-- Latencies are wrk's own (microseconds, every request, not corrected for coordinated
-- omission); "errors" counts non-2xx/3xx answers, connect, read, write errors and timeouts.

local bodies = {}
local i = 0
local counter = 0

setup = function(thread)
  thread:set("id", counter)
  counter = counter + 1
end

init = function(args)
  local path = args[1]
  local f = assert(io.open(path, "r"), "cannot open the bodies file " .. tostring(path))
  for line in f:lines() do
    if #line > 0 then bodies[#bodies + 1] = line end
  end
  f:close()
  assert(#bodies > 0, "no bodies in " .. path)
  i = ((id or 0) * 7919) % #bodies
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

request = function()
  i = i % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "errors": %d, "non_2xx": %d, "p50_ms": %.3f, "p90_ms": %.3f, ' ..
    '"p99_ms": %.3f, "max_ms": %.3f, "duration_s": %.3f, "per_s": %.1f}\n',
    summary.requests, e.connect + e.read + e.write + e.timeout + e.status, e.status,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000, summary.duration / 1e6,
    summary.requests / (summary.duration / 1e6)))
end
