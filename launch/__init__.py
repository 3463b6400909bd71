"""How a trial starts and runs: rank processes, torch.distributed, the training steps, the record."""
