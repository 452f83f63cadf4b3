// decode: being written
