-- wrk: POST /buy/{id} over ids 1..1000, one copy each, a fresh key per request.
counter = 0
request = function()
  counter = counter + 1
  local id = (counter % 1000) + 1
  return wrk.format("POST", "/buy/" .. id, {["Content-Type"] = "application/json",
    ["Idempotency-Key"] = "bench-" .. math.random(1, 1e9) .. "-" .. counter}, '{"quantity": 1}')
end
