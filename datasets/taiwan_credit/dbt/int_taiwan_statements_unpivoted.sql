-- The six monthly statements of each Taiwan client as rows. Column suffixes count back from
-- September 2005 (PAY_0 / BILL_AMT1 / PAY_AMT1) to April 2005 (PAY_6 / BILL_AMT6 / PAY_AMT6).
{%- set months = [
    (0, 1, '2005-09-30'), (2, 2, '2005-08-31'), (3, 3, '2005-07-31'),
    (4, 4, '2005-06-30'), (5, 5, '2005-05-31'), (6, 6, '2005-04-30')
] %}

with

clients as (
    select * from {{ ref('stg_taiwan__credit_clients') }}
),

statements as (
    {%- for status, amount, month_end in months %}
        select
            client_id,
            limit_bal,
            cast('{{ month_end }}' as date) as statement_month,
            pay_{{ status }} as repayment_status,
            bill_amt{{ amount }} as bill_amount,
            pay_amt{{ amount }} as paid_amount
        from clients
        {% if not loop.last %}union all{% endif %}
    {%- endfor %}
)

select * from statements
