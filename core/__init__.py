"""The ground floor: the vocabulary every other folder imports.

Typed configs (config), kernel choices (choices), the trial spec (spec), the record
types, statuses, paths and the one atomic JSON writer (records), the record checker
(record_check), FLOPs/MFU (flops) and repository paths (paths). Nothing here imports
torch or any other folder of this project, so the sweeper and the analysis run without
them; tests/test_layering.py keeps it so.
"""
