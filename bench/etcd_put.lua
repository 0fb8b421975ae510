-- wrk: etcd v3 JSON gateway puts, a distinct key per request (values base64).
dofile("bench/etcd_lib.lua")
counter = 0
request = function()
  counter = counter + 1
  local body = string.format('{"key": "%s", "value": "dmFsdWU="}', ngx_b64("k" .. counter))
  return wrk.format("POST", "/v3/kv/put", {["Content-Type"] = "application/json"}, body)
end
