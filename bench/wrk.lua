-- wrk script of the benchmark (bench/run.py): POST the JSON body in $BENCH_BODY_FILE with
-- $BENCH_AUTH as the bearer key (if set), then print one machine-readable result line:
--   BENCH {"requests":N,"duration_us":D,"rps":R,"p50_us":…,"p90_us":…,"p99_us":…,"max_us":…,
--          "errors":{"connect":…,"read":…,"write":…,"timeout":…,"status":…}}
-- wrk's latency is the time to the *complete* response: for an SSE stream, the last byte.
--   BENCH_BODY_FILE=body.json BENCH_AUTH=qbt_… wrk -t1 -c64 -d5s --latency -s bench/wrk.lua URL
local f = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. auth
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"rps":%.2f,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f,"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,' ..
    '"status":%d}}\n',
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, e.connect, e.read, e.write, e.timeout, e.status))
end
