-- POST /api/active-sessions with a new taskId each time, shaped like a runner's registration.
-- Timed (no hi): ids <prefix>-<lo+tid>, <prefix>-<lo+tid+T>, ... until wrk's duration ends.
-- Seeding (hi given): ids <prefix>-lo .. <prefix>-(hi-1); then the thread sends GET /health
-- fillers (never idle connections: an idle socket would pin a gunicorn sync worker) and,
-- once its last real answer is in, writes <marks>/<tid> so bench.py can stop wrk early.
-- Passes only on 201.
-- wrk ... -s create.lua URL -- key=K prefix=P threads=2 [lo=0] [hi=1000 marks=DIR]
local M = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")
local key, prefix, lo, hi, T, marks
k = 0

setup = M.setup

function init(args)
  local a = M.parse(args)
  key, prefix, marks = a.key, a.prefix, a.marks
  lo, hi, T = tonumber(a.lo or 0), tonumber(a.hi or -1), tonumber(a.threads or 1)
end

function request()
  if M.verify_call() then return M.filler() end
  local n = lo + tid + T * k
  if hi >= 0 and n >= hi then
    exhausted = 1
    M.check_finished(marks)
    return M.filler()
  end
  k = k + 1
  M.sent()
  return wrk.format("POST", "/api/active-sessions",
    {["Authorization"] = "Bearer " .. key, ["X-Agent-ID"] = M.agent(n), ["Content-Type"] = "application/json"},
    M.session_body(prefix, n))
end

function response(status, headers, body)
  if M.is_filler(body) then return end
  M.answer(status == 201, status, body)
  if hi >= 0 and lo + tid + T * k >= hi then exhausted = 1; M.check_finished(marks) end
end

done = M.done
