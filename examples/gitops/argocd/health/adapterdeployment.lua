-- Argo CD health check for ragtune.dev/AdapterDeployment (Lua 5.1, as Argo CD's gopher-lua runs it).
-- Healthy when the requested adapter set is Ready, Progressing while it is gated or rolled out,
-- Degraded when serving is degraded, the candidate was rolled back or the rollout failed.
local hs = {status = "Progressing", message = "Waiting for the ragtune operator"}

if obj.status == nil or obj.status.phase == nil then
  return hs
end

local status = obj.status
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.message = "Spec changed (generation " .. generation .. "); waiting for the operator"
  return hs
end

local function with_message(prefix)
  if status.message ~= nil and status.message ~= "" then
    return prefix .. ": " .. status.message
  end
  return prefix
end

local phase = status.phase
if phase == "Ready" then
  hs.status = "Healthy"
  if status.servingAdapters ~= nil and status.servingAdapters ~= "" then
    hs.message = "Serving " .. status.servingAdapters
  else
    hs.message = "Ready"
  end
elseif phase == "Pending" or phase == "Gating" or phase == "RollingOut" then
  local step = ""
  if status.candidate ~= nil and status.candidate.step ~= nil then
    step = " (" .. status.candidate.step .. ")"
  end
  hs.message = with_message(phase .. step)
elseif phase == "RolledBack" then
  -- The previous adapters still serve, but the requested ones did not pass their gates.
  hs.status = "Degraded"
  hs.message = with_message("Rolled back")
elseif phase == "Degraded" or phase == "Failed" then
  hs.status = "Degraded"
  hs.message = with_message(phase)
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
