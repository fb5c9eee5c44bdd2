-- wrk script: a fleet of agents heartbeating hbs during a rollout.
--
-- Run with as many threads as connections (wrk -t C -c C): each thread then owns one
-- connection, so the response it reads belongs to the request it just sent, and it can play
-- its agents' part. Thread k owns hosts k, k + C, k + 2C, ... and beats them in turn, each
-- once per pass (a fleet beating once a minute, seen for the length of the run). A host that
-- receives an order comes back after `work` more requests of its thread saying it is
-- downloading (the server renews its lease), and after twice that with the new version (the
-- server counts it done and frees its slot for the next host).
--
-- Arguments (after --): threads hosts old_version new_version work [body_file]
-- The request body is the body of a real agent's heartbeat, with HOST and VERSION and STATE
-- replaced; `body_file` holds it (default: a minimal body).

local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

local function template_from(path)
  if path == nil then
    return '{"host":"HOST","version":"VERSION","state":"STATE"}'
  end
  local f = assert(io.open(path, "r"))
  local text = f:read("*a")
  f:close()
  return (text:gsub("%s+$", ""))
end

function init(args)
  nthreads = tonumber(args[1])
  hosts = tonumber(args[2])
  old, new = args[3], args[4]
  work = tonumber(args[5])
  template = template_from(args[6])
  cursor = id
  sent = 0
  renew, finish = {}, {}
  renew_head, renew_tail, finish_head, finish_tail = 1, 0, 1, 0
  last = nil
  orders, renewals, finished = 0, 0, 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

local function body(host, version, state)
  local name = string.format("h%07d", host)
  return (template:gsub("HOST", name):gsub("VERSION", version):gsub("STATE", state))
end

function request()
  sent = sent + 1
  last = nil
  if finish_head <= finish_tail and finish[finish_head][2] <= sent then
    local host = finish[finish_head][1]
    finish[finish_head] = nil
    finish_head = finish_head + 1
    finished = finished + 1
    return wrk.format(nil, nil, nil, body(host, new, "idle"))
  end
  if renew_head <= renew_tail and renew[renew_head][2] <= sent then
    local host = renew[renew_head][1]
    renew[renew_head] = nil
    renew_head = renew_head + 1
    renewals = renewals + 1
    return wrk.format(nil, nil, nil, body(host, old, "downloading"))
  end
  last = cursor
  cursor = cursor + nthreads
  if cursor >= hosts then
    cursor = id
  end
  return wrk.format(nil, nil, nil, body(last, old, "idle"))
end

function response(status, headers, response_body)
  if last ~= nil and status == 200 and response_body:sub(1, 14) ~= '{"order":null}' then
    orders = orders + 1
    renew_tail = renew_tail + 1
    renew[renew_tail] = {last, sent + work}
    finish_tail = finish_tail + 1
    finish[finish_tail] = {last, sent + 2 * work}
  end
end

function done(summary, latency, requests)
  local o, r, f = 0, 0, 0
  for _, thread in ipairs(threads) do
    o = o + thread:get("orders")
    r = r + thread:get("renewals")
    f = f + thread:get("finished")
  end
  io.write(string.format("ROLLOUT orders=%d renewals=%d finished=%d\n", o, r, f))
end
