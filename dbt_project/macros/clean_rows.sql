{#- The rows of a raw table that passed validation: the partition's latest verdict passed and
    the row is not in quarantine. Validation writes both tables (keel/validation.py). -#}
{% macro clean_rows(relation, table_name) %}
    select raw_rows.*
    from {{ relation }} as raw_rows
    where
        exists (
            select 1
            from validation.partition_verdicts as verdicts
            where
                verdicts.table_name = '{{ table_name }}'
                and verdicts._partition = raw_rows._partition
                and verdicts.passed
        )
        and not exists (
            select 1
            from quarantine.{{ table_name }} as quarantined
            where
                quarantined._partition = raw_rows._partition
                and quarantined._row_number = raw_rows._row_number
        )
{% endmacro %}
