#![no_std]
// This file exists so that cargo can check the crate on the host; the program is main.rs.
