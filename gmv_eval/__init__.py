"""`gmv eval`: attribution evaluated by the GMValuator paper's criteria C1-C4, through the real
server. The command (command.py: `register`, `run`), the criteria's math (criteria.py), the
demo's generator and data (cvae.py, digits_data.py) and the report (report.py).

An optional part of GMV: its plots need matplotlib and its demo data scikit-learn, the `eval`
extra (`pip install -e '.[eval]'`); serving needs neither.
"""
