-- wrk: POST /buy/{id} over ids 1..BOOKS (from the environment, default 1000), one copy
-- each, a fresh key per request.
local books = tonumber(os.getenv("BOOKS") or "1000")
counter = 0
request = function()
  counter = counter + 1
  local id = (counter % books) + 1
  return wrk.format("POST", "/buy/" .. id, {["Content-Type"] = "application/json",
    ["Idempotency-Key"] = "bench-" .. math.random(1, 1e9) .. "-" .. counter}, '{"quantity": 1}')
end
