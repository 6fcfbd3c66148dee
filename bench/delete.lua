-- DELETE /api/active-sessions/by-task/<taskId>, each id once, with the runner's X-Agent-ID.
-- Deletes what a timed create.lua run with the same prefix and thread count made: thread t
-- deletes <prefix>-(t), <prefix>-(t+T), ... for its first limit[t] ids (limits=a,b,...),
-- then sends GET /health fillers and, once its last real answer is in, writes <marks>/<tid>
-- (bench.py then stops wrk; the rate uses this script's own clock, first request to last answer).
-- Passes only on 200 {"deleted": true}: a false means the id was not there (a miss).
-- wrk ... -s delete.lua URL -- key=K prefix=P threads=2 limits=5000,5000 [marks=DIR]
local M = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")
local key, prefix, T, limit, marks
k = 0

setup = M.setup

function init(args)
  local a = M.parse(args)
  key, prefix, marks, T = a.key, a.prefix, a.marks, tonumber(a.threads or 1)
  local limits = {}
  for v in (a.limits or ""):gmatch("[^,]+") do table.insert(limits, tonumber(v)) end
  limit = limits[tid + 1] or 0
end

function request()
  if M.verify_call() then return M.filler() end
  if k >= limit then
    exhausted = 1
    M.check_finished(marks)
    return M.filler()
  end
  local n = tid + T * k
  k = k + 1
  M.sent()
  return wrk.format("DELETE", "/api/active-sessions/by-task/" .. M.task(prefix, n),
    {["Authorization"] = "Bearer " .. key, ["X-Agent-ID"] = M.agent(n)})
end

function response(status, headers, body)
  if M.is_filler(body) then return end
  M.answer(status == 200 and body:find('"deleted":true', 1, true) ~= nil, status, body)
  if k >= limit then M.check_finished(marks) end
end

done = M.done
