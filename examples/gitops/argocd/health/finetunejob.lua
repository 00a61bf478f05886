-- Argo CD health check for ragtune.dev/FineTuneJob (Lua 5.1, as Argo CD's gopher-lua runs it).
-- Healthy once the run Succeeded, Degraded when it Failed, Suspended when suspended,
-- Progressing while it waits, trains or evaluates, or while the operator has not yet
-- observed the latest spec.
local hs = {status = "Progressing", message = "Waiting for the ragtune operator"}

local function condition(status, type_)
  if status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then return c end
  end
  return nil
end

if obj.status == nil or obj.status.phase == nil then
  if obj.spec ~= nil and obj.spec.suspend == true then
    hs.status = "Suspended"
    hs.message = "Suspended before it started"
  end
  return hs
end

local status = obj.status
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.message = "Spec changed (generation " .. generation .. "); waiting for the operator"
  return hs
end

local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Succeeded"
  if status.score ~= nil then hs.message = hs.message .. ": " .. status.score end
elseif phase == "Failed" then
  hs.status = "Degraded"
  local failed = condition(status, "Failed")
  if status.message ~= nil and status.message ~= "" then
    hs.message = status.message
  elseif failed ~= nil then
    hs.message = (failed.reason or "Failed") .. ": " .. (failed.message or "")
  else
    hs.message = "Failed"
  end
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = status.message or "Suspended"
else
  -- Pending, Queued, Running, Evaluating: say why it waits (e.g. Unschedulable, a Kueue quota) or how far it got.
  hs.message = phase
  if status.progress ~= nil and status.progress.percent ~= nil then
    hs.message = hs.message .. " (" .. status.progress.percent .. "%)"
  end
  if status.message ~= nil and status.message ~= "" then
    hs.message = hs.message .. ": " .. status.message
  end
end
return hs
