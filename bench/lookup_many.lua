-- wrk: GET {prefix}/{id} over ids 1..1000 (prefix from the environment, e.g. /books).
local prefix = os.getenv("PREFIX") or "/lookup"
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", prefix .. "/" .. ((counter % 1000) + 1))
end
