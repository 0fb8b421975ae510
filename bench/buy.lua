-- wrk: POST /buy/{id} over ids 1..BOOKS (from the environment, default 1000), one copy
-- each, a key no other request of any run has used: the run's start (seconds and the
-- process's clock), the wrk thread, and a counter. (wrk gives every thread a Lua state of
-- its own with the same unseeded `math.random`, so random keys repeat across threads and
-- runs, and a repeated key is a cheap replay of a buy, not a buy.)
local books = tonumber(os.getenv("BOOKS") or "1000")
local run = string.format("%d.%d", os.time(), math.floor(os.clock() * 1e6))
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end

counter = 0
request = function()
  counter = counter + 1
  local item = (counter % books) + 1
  local key = string.format("bench-%s-%d-%d", run, id or 0, counter)
  return wrk.format("POST", "/buy/" .. item, {["Content-Type"] = "application/json",
    ["Idempotency-Key"] = key}, '{"quantity": 1}')
end
