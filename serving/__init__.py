"""Ray Serve deployments of the aligned retriever, re-ranker, rephraser and judge; the web page; the votes database."""
