-- wrk: GET {prefix}/{id} over ids 1..BOOKS (prefix and BOOKS from the environment, e.g.
-- PREFIX=/books; BOOKS defaults to 1000).
local prefix = os.getenv("PREFIX") or "/lookup"
local books = tonumber(os.getenv("BOOKS") or "1000")
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", prefix .. "/" .. ((counter % books) + 1))
end
