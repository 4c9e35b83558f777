//! HTTP client for the krvirt API
