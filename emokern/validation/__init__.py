"""Layer 5, does a bank work: the external datasets, the report and its sections 5-7
(concept and cause checks)."""
