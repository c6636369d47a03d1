-- Orthanc routing rule: forward acute-stroke imaging to StrokeGate.
--
-- When a study has been quiet for "StableAge" seconds, its CT and MR series that StrokeGate has
-- not had yet are sent to the modality "strokegate" (DicomModalities in strokegate.json) in one
-- synchronous C-STORE job, then marked with the metadata "StrokeGateForwarded". StrokeGate's own
-- results (SEG, SR, secondary captures) are never sent back to it. StrokeGate decides itself which
-- series it can analyse (CT perfusion, DWI/ADC, DSC-PWI, vendor maps); a send that fails is logged
-- and retried the next time the study changes, or by hand from Orthanc Explorer.

local TARGET = 'strokegate'
local STROKEGATE_AET = 'STROKEGATE'
local FORWARDED = 'StrokeGateForwarded'

local function contains(list, value)
  for _, item in ipairs(list) do
    if item == value then return true end
  end
  return false
end

local function fromStrokeGate(series)
  local instance = series['Instances'][1]
  if instance == nil then return false end
  local names = ParseJson(RestApiGet('/instances/' .. instance .. '/metadata'))
  if not contains(names, 'RemoteAET') then return false end
  return RestApiGet('/instances/' .. instance .. '/metadata/RemoteAET') == STROKEGATE_AET
end

function OnStableStudy(studyId, tags, metadata)
  local wanted = {}
  for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    local modality = series['MainDicomTags']['Modality']
    local names = ParseJson(RestApiGet('/series/' .. series['ID'] .. '/metadata'))
    if (modality == 'CT' or modality == 'MR') and not contains(names, FORWARDED)
        and not fromStrokeGate(series) then
      table.insert(wanted, series['ID'])
    end
  end
  if #wanted == 0 then return end
  local request = DumpJson({ Resources = wanted, Synchronous = true }, true)
  local ok, answer = pcall(RestApiPost, '/modalities/' .. TARGET .. '/store', request)
  if ok and answer ~= nil then
    for _, id in ipairs(wanted) do
      RestApiPut('/series/' .. id .. '/metadata/' .. FORWARDED, 'yes')
    end
    print('StrokeGate: forwarded ' .. #wanted .. ' series of study ' .. studyId)
  else
    print('StrokeGate: forwarding study ' .. studyId .. ' failed; retried when the study changes')
  end
end
