-- wrk script for the taskapp benchmark:
--   wrk -tN -cC ... -s taskapp.lua URL -- SCENARIO USERS_FILE N [RATE]
--
-- USERS_FILE has one line per user: token <TAB> pages of 10 tasks <TAB> comma-separated task ids
-- [<TAB> comma-separated ids of their shared projects].
-- Scenarios: hot (page 1, first user; also what the independent ceiling is loaded with), list
-- (random user, one of their first 10 pages), deep (random user, any of their pages, the last
-- included), get, create, patch, mixed (40% list, 40% get, 10% create, 10% patch), tokens
-- (each of the thread's users in turn asks for a page far past its tasks: every token
-- presented once, as a client's first request does, without warming any entry the scenarios
-- read), introduce (the same with GET /users/me).
-- On the shared data set: shared (random user, one of their first 5 pages), project (one of
-- their shared projects, one of its first 3 pages), assigned (their tasks, one of the first 3
-- pages).
--
-- A user is a client: wrk thread k (of N) sends only users k, k + N, k + 2N, ... over its
-- own connections.
-- RATE (requests per second, all threads together) paces the load: each thread sends its
-- share on a fixed schedule (open loop while the server keeps up) instead of back to back.
-- Its requests take the next free slot of that schedule, so a late response is made up by
-- the following ones and the rate holds. Without RATE no delay() is defined and wrk runs
-- closed loop, as fast as the server answers.
-- done() prints one JSON line: requests, duration, latency percentiles (microseconds), late
-- requests of a paced run, errors.

local users = {}
local first_auth
local next_user = 0
local scenario
local counter = 0
local statuses = { "pending", "in_progress", "completed" }

local function split(s, sep)
  local out = {}
  for part in string.gmatch(s, "([^" .. sep .. "]+)") do
    out[#out + 1] = part
  end
  return out
end

local threads = {}

local ffi = require("ffi")
ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } taskapp_timespec;
int clock_gettime(int clock, taskapp_timespec *tp);
]])
local CLOCK_MONOTONIC = 1
local timespec = ffi.new("taskapp_timespec")

local function now_us()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
  return tonumber(timespec.tv_sec) * 1e6 + tonumber(timespec.tv_nsec) / 1e3
end

-- Paced requests sent more than LATE_US after their slot (every connection of the thread was
-- busy): wrk times a request from its sending, so their wait is not in the percentiles.
-- Globals, so that done() can read them from each thread.
local LATE_US = 10000
late = 0
late_max_us = 0

-- The schedule of a paced thread: one slot every `interval` microseconds.
local function pace(interval)
  local next_slot
  return function()
    local now = now_us()
    -- Threads start at random points of their first interval, not all at once.
    next_slot = next_slot or (now + math.random() * interval)
    local slot = next_slot
    next_slot = next_slot + interval
    if slot <= now then
      local behind = now - slot
      if behind > LATE_US then
        late = late + 1
      end
      late_max_us = math.max(late_max_us, behind)
      return 0
    end
    return math.floor((slot - now) / 1000)
  end
end

function setup(thread)
  thread:set("tid", #threads + 1)
  threads[#threads + 1] = thread
end

function init(args)
  scenario = args[1]
  local nthreads = tonumber(args[3] or "1")
  local index = 0
  for line in io.lines(args[2]) do
    local fields = split(line, "\t")
    first_auth = first_auth or ("Bearer " .. fields[1])
    if index % nthreads == (tid or 1) - 1 then
      users[#users + 1] = {
        auth = "Bearer " .. fields[1],
        pages = tonumber(fields[2]),
        ids = fields[3] and split(fields[3], ",") or {},
        projects = fields[4] and split(fields[4], ",") or {},
      }
    end
    index = index + 1
  end
  math.randomseed(os.time() * 100 + (tid or 0))
  local rate = tonumber(args[4] or "")
  if rate and rate > 0 then
    -- wrk looks for a global delay() after init(), so only a paced run defines one.
    delay = pace(1e6 * nthreads / rate)
  end
end

local function list(user, pages)
  local page = math.random(math.min(user.pages, pages))
  return wrk.format("GET", "/tasks?page=" .. page .. "&page_size=10", { Authorization = user.auth })
end

local function get(user)
  return wrk.format("GET", "/tasks/" .. user.ids[math.random(#user.ids)], { Authorization = user.auth })
end

local function create(user)
  counter = counter + 1
  local body = '{"title":"Bench task ' .. counter .. '","description":"Created under load","status":"pending"}'
  return wrk.format("POST", "/tasks", { Authorization = user.auth, ["Content-Type"] = "application/json" }, body)
end

local function patch(user)
  local body = '{"status":"' .. statuses[math.random(3)] .. '"}'
  local headers = { Authorization = user.auth, ["Content-Type"] = "application/json" }
  return wrk.format("PATCH", "/tasks/" .. user.ids[math.random(#user.ids)], headers, body)
end

local function page_of(path, user, pages)
  local separator = path:find("?", 1, true) and "&" or "?"
  local query = separator .. "page=" .. math.random(pages) .. "&page_size=10"
  return wrk.format("GET", path .. query, { Authorization = user.auth })
end

function request()
  if scenario == "hot" then
    return wrk.format("GET", "/tasks?page=1&page_size=10", { Authorization = first_auth })
  elseif scenario == "tokens" then
    next_user = next_user % #users + 1
    return wrk.format("GET", "/tasks?page=1000000&page_size=1", { Authorization = users[next_user].auth })
  elseif scenario == "introduce" then
    next_user = next_user % #users + 1
    return wrk.format("GET", "/users/me", { Authorization = users[next_user].auth })
  end
  local user = users[math.random(#users)]
  if scenario == "shared" then
    return page_of("/tasks", user, math.min(user.pages, 5))
  elseif scenario == "project" then
    return page_of("/tasks?project=" .. user.projects[math.random(#user.projects)], user, 3)
  elseif scenario == "assigned" then
    return page_of("/tasks?assignee=me", user, 3)
  elseif scenario == "list" then
    return list(user, 10)
  elseif scenario == "deep" then
    return list(user, user.pages)
  elseif scenario == "get" then
    return get(user)
  elseif scenario == "create" then
    return create(user)
  elseif scenario == "patch" then
    return patch(user)
  end
  local roll = math.random(10)
  if roll <= 4 then
    return list(user, 10)
  elseif roll <= 8 then
    return get(user)
  elseif roll == 9 then
    return create(user)
  end
  return patch(user)
end

function done(summary, latency, requests)
  local e = summary.errors
  local late_total, late_max = 0, 0
  for _, thread in ipairs(threads) do
    late_total = late_total + (thread:get("late") or 0)
    late_max = math.max(late_max, thread:get("late_max_us") or 0)
  end
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,'
      .. '"late":%d,"late_max_us":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d}}\n',
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    late_total, late_max, e.connect, e.read, e.write, e.timeout, e.status
  ))
end
