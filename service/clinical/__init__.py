"""Clinical data from the EHR: NIHSS records (nihss), received over HL7 v2 (hl7) or found on a FHIR
R4 server (fhir), or posted to the REST API."""
