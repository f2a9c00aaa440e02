-- wrk script: POST a small non-stream Responses request to `bastion sim`.
-- wrk -t1 -c64 -d10s -s bench/sim_post.lua http://127.0.0.1:8011/v1/responses
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"gpt-oss-120b","input":"Reply with: ok","max_output_tokens":32,"store":false}'
