"""The audit API: eligibility for any instant, evidence, timelines, receipts and their audits."""
