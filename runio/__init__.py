"""Run I/O, the ground floor under every package that writes results: atomic files (`files`), checkpoints that
survive crashes and full disks (`checkpoint`), run logs to CSV and TensorBoard (`logs`) and the lock that lets one
process at a time train a run directory (`lock`). It imports nothing of the project."""
