-- wrk script of benchmarks/serve.py: POST /v1/predict, one question per request, the
-- endpoint cycled over the first 1,000 of the benchmark's synthetic endpoints.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local i = 0
request = function()
  i = (i + 1) % 1000
  local body = string.format('{"endpoint_id": "e-%06d", "horizons": [1, 6, 12]}', i)
  return wrk.format(nil, nil, nil, body)
end
