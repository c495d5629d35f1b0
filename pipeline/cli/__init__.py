"""The command line's rooms: the run folder, one function per stage, planning, export, evaluation during training,
submitting and choosing a checkpoint. `pipeline/run.py` is the entry point that puts them in order."""
