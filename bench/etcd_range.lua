-- wrk: etcd v3 JSON gateway ranges (linearizable, etcd's default) of one key each, over
-- k1..k1000, which the put run wrote.
dofile("bench/etcd_lib.lua")
counter = 0
request = function()
  counter = counter + 1
  local body = string.format('{"key": "%s"}', ngx_b64("k" .. (counter % 1000 + 1)))
  return wrk.format("POST", "/v3/kv/range", {["Content-Type"] = "application/json"}, body)
end
