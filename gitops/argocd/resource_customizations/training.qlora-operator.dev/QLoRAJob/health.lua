-- Argo CD health for a QLoRAJob (training.qlora-operator.dev), from the conditions the operator writes.
--   Progressing  no status yet, status.observedGeneration behind metadata.generation, or pending,
--                queued, unschedulable, running, retrying: anything not finished and not suspended
--   Suspended    Suspended=True (spec.suspend)
--   Healthy      Succeeded=True: the adapter is published
--   Degraded     Failed=True, with the reason (OOMKilled, DeadlineExceeded, BadData, ...) and message
-- Argo runs this with gopher-lua (Lua 5.1) and, from argocd-cm, without the string library: only
-- base functions, tables and `..` are used here.

local hs = {}

local function condition(status, ctype)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

-- "Reason: message", or whichever of the two is there.
local function told(c, fallback)
  if c == nil then
    return fallback
  end
  local reason = c.reason or ""
  local message = c.message or ""
  if reason ~= "" and message ~= "" then
    return reason .. ": " .. message
  end
  if reason ~= "" then
    return reason
  end
  if message ~= "" then
    return message
  end
  return fallback
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to accept the job"
  return hs
end

local generation = obj.metadata.generation
local observed = status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation) ..
    " (it has seen " .. tostring(observed or 0) .. ")"
  return hs
end

-- The terminal and paused states, first match wins: a True condition of this type is this health.
local decisive = {{"Failed", "Degraded"}, {"Succeeded", "Healthy"}, {"Suspended", "Suspended"}}
for _, pair in ipairs(decisive) do
  local found = condition(status, pair[1])
  if is_true(found) then
    hs.status = pair[2]
    hs.message = told(found, pair[1])
    return hs
  end
end

-- Not finished, not suspended: whatever else it is (pending, queued, unschedulable, running,
-- retrying after a retryable failure, or a reason this script does not know yet), it is on its way.
-- Scheduled=False (unschedulable, or waiting in a queue) says more than Running=False.
local scheduled = condition(status, "Scheduled")
hs.status = "Progressing"
if scheduled ~= nil and scheduled.status == "False" then
  hs.message = told(scheduled, "Waiting to be scheduled")
else
  hs.message = told(condition(status, "Running"), status.message or "Waiting for the trainer to start")
end
return hs
