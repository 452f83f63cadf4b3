// prefill: being written
