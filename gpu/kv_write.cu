// kv_write: being written
