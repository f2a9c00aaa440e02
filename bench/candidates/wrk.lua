-- wrk script: POST the body in $WRK_BODY_FILE (or GET when unset); prints one RESULT line.
local f = os.getenv("WRK_BODY_FILE")
if f and f ~= "" then
  local h = assert(io.open(f, "rb"))
  wrk.method = "POST"
  wrk.body = h:read("*a")
  h:close()
  wrk.headers["Content-Type"] = "application/json"
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %.1f %.3f %.3f %d %d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.connect + e.read + e.write + e.timeout, e.status))
end
