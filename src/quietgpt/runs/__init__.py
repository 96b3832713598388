"""A run folder on disk: what a checkpoint holds and how it is written and read without ever being left
half-written (checkpoint.py: model.safetensors, config.json, train_state.pt, best/), and the lock that keeps
two processes out of one run or study folder (lock.py). The training loop decides *when* to save
(training/checkpointer.py); this layer is *what* is saved, so evaluation, export and studies read it too."""
