-- PUT /api/active-sessions/heartbeat/<taskId>, rotating over `count` seeded taskIds
-- (<prefix>-<lo> .. <prefix>-<lo+count-1>), with the runner's X-Agent-ID.
-- Passes only on 200 {"updated": true}.
-- wrk ... -s heartbeat.lua URL -- key=K prefix=P lo=0 count=1000 threads=2
local M = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")
local key, prefix, lo, count, T
k = 0

setup = M.setup

function init(args)
  local a = M.parse(args)
  key, prefix = a.key, a.prefix
  lo, count, T = tonumber(a.lo or 0), tonumber(a.count or 1000), tonumber(a.threads or 1)
end

function request()
  if M.verify_call() then return M.filler() end
  local n = lo + (tid + T * k) % count
  k = k + 1
  M.sent()
  return wrk.format("PUT", "/api/active-sessions/heartbeat/" .. M.task(prefix, n),
    {["Authorization"] = "Bearer " .. key, ["X-Agent-ID"] = M.agent(n)})
end

function response(status, headers, body)
  M.answer(status == 200 and body:find('"updated":true', 1, true) ~= nil, status, body)
end

done = M.done
