//! Discovery: the model translated into Istio's discovery resources and served to node
//! proxies over delta xDS.

pub mod translate;
