-- Every request's bytes differ (an X-Request-Id counter), as from clients that add a
-- per-request header: nothing a server remembers of earlier request bytes applies.
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, nil, { ["X-Request-Id"] = tostring(counter) })
end
