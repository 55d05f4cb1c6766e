"""The server side of SMTP: a command codec, a sans-I/O server state machine
(:mod:`txcolombe.server.machine`) and its Twisted protocol
(:mod:`txcolombe.server.protocol`)."""
