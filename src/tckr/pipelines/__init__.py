"""KFP pipelines (installed as ``tckr.pipelines``); each compiles to the YAML committed beside it."""
