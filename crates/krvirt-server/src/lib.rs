//! krvirt API server and controllers
