{#- Age bands used for fairness reports (keel.schema.AGE_BANDS). -#}
{% macro age_band(age) %}
    case
        when {{ age }} < 26 then '18-25'
        when {{ age }} < 36 then '26-35'
        when {{ age }} < 51 then '36-50'
        when {{ age }} < 66 then '51-65'
        else '66+'
    end
{% endmacro %}
