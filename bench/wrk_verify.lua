-- wrk script for the fetchpool benchmark: a distinct query string per request (like the other
-- clients) and a check of every response: status 200 and a body of the expected length
-- (wrk ... URL -- <expected body bytes>). The count of wrong answers is printed as "BAD n".
local counter = 0
local expected = 0
local bad = 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  expected = tonumber(args[1]) or 0
end

function request()
  counter = counter + 1
  return wrk.format(nil, wrk.path .. "?i=" .. counter .. "&r=wrk")
end

function response(status, headers, body)
  if status ~= 200 or #body ~= expected then
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do
    total = total + (thread:get("bad") or 0)
  end
  io.write(string.format("BAD %d\n", total))
end
