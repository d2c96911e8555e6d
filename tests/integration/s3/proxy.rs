//! A fault-injecting TCP proxy on loopback, in front of the S3 server.
