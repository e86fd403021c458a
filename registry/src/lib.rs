//! registry daemon
