-- Shared by the benchmark's wrk scripts (loaded with dofile; not a wrk script itself).
--
-- Every answer is checked: a script's response() calls M.answer(ok). done() prints one line,
-- "BENCH_JSON {...}", that bench/bench.py parses: answers that passed and failed, the first
-- failure seen, wrk's socket errors, latency percentiles and the span between the first
-- request and the last answer (measured here, with a monotonic clock, so runs that end
-- early - a pool of ids used up - still give a true rate).
--
-- Arguments come after wrk's "--" as key=value words. Ids are <prefix>-<n>; thread t of T
-- (t from 0) takes n = lo + t, lo + t + T, lo + t + 2T, ... so threads never collide.

local M = {}

local ffi_ok, ffi = pcall(require, "ffi")
if ffi_ok then
  ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clk_id, bench_timespec *tp);
  ]]
  local ts = ffi.new("bench_timespec")
  function M.now()
    ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
  end
else
  M.now = os.time
end

function M.parse(args)
  local a = {}
  for _, word in ipairs(args or {}) do
    local k, v = word:match("^([^=]+)=(.*)$")
    if k then a[k] = v end
  end
  return a
end

-- One session per n, shaped like the agent-swarm runner's registration.
local DESCRIPTION = ("Implement the requested change, run the test suite, and report back with a summary " ..
  "of what changed and why; keep the diff small and the commit message clear. Then open a pull request. "):sub(1, 200)

function M.agent(n)
  return string.format("00000000-0000-4000-8000-%012d", n % 40)
end

function M.task(prefix, n)
  return prefix .. "-" .. n
end

function M.session_body(prefix, n)
  local len = 40 + (n * 37) % 161 -- 40..200 characters
  return string.format(
    '{"agentId":"%s","taskId":"%s","triggerType":"task_assigned","taskDescription":"%s",' ..
    '"runnerSessionId":"%s-runner-%d","runtimeInstanceId":"%s-rt-%d"}',
    M.agent(n), M.task(prefix, n), DESCRIPTION:sub(1, len), prefix, n, prefix, n % 40)
end

-- Per-thread state (globals so the done() phase can read them with thread:get).
ok, bad, sent, t_first, t_last, first_bad = 0, 0, 0, 0, 0, ""

function M.sent()
  if sent == 0 then t_first = M.now() end
  sent = sent + 1
end

function M.answer(passed, status, body)
  t_last = M.now()
  if passed then
    ok = ok + 1
  else
    bad = bad + 1
    if first_bad == "" then first_bad = tostring(status) .. " " .. tostring(body):sub(1, 200) end
  end
end

-- When a thread has sent all it had to send it keeps its connections busy with GET /health
-- (an idle connection would pin a gunicorn sync worker until its timeout); those answers are
-- told apart by their body and not counted.
exhausted, marked = 0, false

-- wrk calls request() once in thread 0, before the run, only to check the request's shape
-- (script_verify_request); that call must not use up an id.
function M.verify_call()
  if tid == 0 and not verified then
    verified = true
    return true
  end
  return false
end

function M.filler()
  return wrk.format("GET", "/health", {})
end

function M.is_filler(body)
  return body:sub(1, 10) == '{"status":'
end

function M.check_finished(marks)
  if not marked and ok + bad >= sent then
    marked = true
    if marks then
      local f = io.open(marks .. "/" .. tid, "w")
      if f then f:close() end
    end
  end
end

-- setup()/done() run in wrk's main Lua state.
local threads = {}
function M.setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local function jstr(s)
  return '"' .. tostring(s):gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end) .. '"'
end

function M.done(summary, latency)
  local tot_ok, tot_bad, tot_sent, first, last, bad_sample = 0, 0, 0, math.huge, 0, ""
  local per = {}
  for _, t in ipairs(threads) do
    local o, b, s = t:get("ok") or 0, t:get("bad") or 0, t:get("sent") or 0
    tot_ok, tot_bad, tot_sent = tot_ok + o, tot_bad + b, tot_sent + s
    local f, l = t:get("t_first") or 0, t:get("t_last") or 0
    if s > 0 and f < first then first = f end
    if l > last then last = l end
    if bad_sample == "" then bad_sample = t:get("first_bad") or "" end
    table.insert(per, string.format('{"ok":%d,"bad":%d,"sent":%d,"exhausted":%d}', o, b, s, t:get("exhausted") or 0))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"ok":%d,"bad":%d,"sent":%d,"span":%.6f,"duration":%.6f,"requests":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_ms":{"p50":%.3f,"p90":%.3f,"p99":%.3f,"mean":%.3f,"max":%.3f},' ..
    '"first_bad":%s,"threads":[%s]}\n',
    tot_ok, tot_bad, tot_sent, (first < math.huge and last > first) and (last - first) or 0,
    summary.duration / 1e6, summary.requests,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3,
    latency.mean / 1e3, latency.max / 1e3,
    jstr(bad_sample), table.concat(per, ",")))
end

return M
