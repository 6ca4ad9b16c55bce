"""Evaluation of attribution by the paper's criteria C1-C4 (`gmv eval`): the criteria's math
(criteria.py), the demo's generator and data (cvae.py, digits_data.py) and the report (report.py)."""
