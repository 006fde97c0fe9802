"""Black-box targets: the HTTP client of an endpoint (`client`) and the query phase that sends each
trial's kept adversarial images (`query`). The reference endpoint is `raystudy.cluster.serve`."""
