"""Where runs live: MLflow tracking, the S3 object store, local servers, the kfp.local runner, KFP submission."""
